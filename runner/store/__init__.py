"""Storage (local and S3), input sources, completion markers and draws tables."""
