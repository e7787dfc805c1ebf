"""The master process: ROUTER server, store, scheduler, result intake, collection, statistics, HTTP API."""
