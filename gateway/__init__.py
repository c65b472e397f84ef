"""An asyncio MQTT device gateway between a broker and PostgreSQL."""

__version__ = "0.1.0"
