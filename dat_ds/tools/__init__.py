"""Run tools: start-up checks (preflight), weight export, and guards for untrusted files."""
