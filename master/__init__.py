"""ticketfarm master: ROUTER server, ticket store, scheduler, collection, statistics, control CLI."""
