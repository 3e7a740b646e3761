"""Files for the type checker only, never run: what ``mypy --strict`` must reject or accept."""
