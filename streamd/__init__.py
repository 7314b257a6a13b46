"""streamd: a real-time stream analytics daemon (ticks in over ZeroMQ, rolling-window signals out)."""

__version__ = "0.1.0"
