"""Thin HTTP handlers: read the request, call the use case, write the response."""
