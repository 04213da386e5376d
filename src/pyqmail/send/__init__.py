"""pyqmail-send: the queue manager and its local and remote deliveries."""
