"""The PostgreSQL archive of finished generations (``BROKER_ARCHIVE_URL``).

``store``: the tables and every read and write of them; ``schema``: the SQL migrations
applied at start-up; ``archiver``: the loop that copies generations that ended and lets Redis
forget them. Nothing here is imported unless an archive is configured.
"""
