-- Only running turns in the index that finds them (as on PostgreSQL): a turn's end then removes
-- its entry from one small page, instead of moving it into the ever-growing rest of the index.
DROP INDEX turns_running;
CREATE INDEX turns_running ON turns (status) WHERE status = 'running';
