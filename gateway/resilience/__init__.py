"""Serving through outages of what the gateway depends on: the database, Redis
and the Celery broker. Inference never waits on them; what they could not take
(usage records, task messages) is kept and handed over when they return."""
