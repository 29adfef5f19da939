"""The worker plane: the messages between the controller, the scheduler and the workers
(``wire``), their seals (``seal``), request/reply over nng (``rpc``), filter declarations on
the wire (``declarations``), TLS for HTTPS and ``tls+tcp://`` (``tls``) and the join token left for
this machine's workers (``localjoin``)."""
