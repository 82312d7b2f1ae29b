"""The operator console: server-rendered pages at /admin behind the admin key.

Kept import-light on purpose: gateway/routes/reports.py imports the session
module from here, and the routes import the rest of the gateway.
"""
