"""The job runtime: a job's life on a worker, its control, micro-batching, building a worker."""
