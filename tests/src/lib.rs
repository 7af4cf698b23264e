//! Integration tests against a real RabbitMQ live in `tests/tests`.
