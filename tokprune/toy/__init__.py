"""The toy VLM and its procedural task (groundwork of `tokprune demo`)."""
