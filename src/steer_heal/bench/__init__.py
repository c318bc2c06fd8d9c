"""`just bench`: performance figures for docs/performance.md (see __main__.py for the parts)."""
