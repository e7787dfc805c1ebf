"""Client side: the futures API, the control and HTTP clients, the embedded local cluster, the progress bar."""
