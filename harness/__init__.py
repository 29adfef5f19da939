"""What the tests and the benchmarks run DPIP with: a local system of real processes
(``localsys``), PostgreSQL and an S3 server started for them (``engines``), test frames
(``frames``), the reference's HTTP client (``refclient``) and a process's CPU from /proc (``proccpu``)."""
