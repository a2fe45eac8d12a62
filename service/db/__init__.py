"""Postgres access: the pool (``pool.py``) and SQL grouped by what it holds, one module each."""
