"""Everything that runs inside the pods and in local mode: data, models, sampling, combining, storage."""
