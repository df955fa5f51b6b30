-- The once-hash field a run that lost its job sets after it wrote result.json anyway
-- (it stalled between its lease check and the write): the run that ends the job writes
-- result.json again after its final record, so the file never disagrees with it.
local STALE = 'result.json:stale'
