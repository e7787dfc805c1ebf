"""ticketfarm slave: DEALER daemon that runs workers and streams their results back."""
