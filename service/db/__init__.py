"""Postgres access: the pool (``pool.py``) and every SQL statement (``queries.py``)."""
