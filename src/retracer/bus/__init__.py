"""Event transports: the embedded inbox (no broker) and RabbitMQ (kombu over py-amqp).

Both hand the service batches of raw event bodies; the service applies a batch in one transaction and
only then acknowledges it, so a kill at any point leaves every event either applied or still queued.
"""
