"""One module per CLI command (or command group); each defines ``register(app)``."""
