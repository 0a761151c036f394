"""Where outputs live (the store) and how each is shown as a Prefect artifact."""
