"""One router per resource: jobs, stores, and the service's own health and metrics."""
