"""Run tools: start-up checks (``preflight``) and weight export (``dat-ds export``)."""
