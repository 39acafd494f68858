"""The bus: where events come from and where messages go. ``base`` is the protocol the service depends on;
``embedded`` (an inbox table in the job database), ``amqp`` (RabbitMQ) and ``stub`` (in memory, for tests)
implement it, and ``connect.open_bus`` picks the configured one."""
