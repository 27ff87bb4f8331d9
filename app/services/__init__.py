"""The service layer: what the API does, as plain functions of the store, the queue and resolved
values; the routes (app/routes/) parse, authorize, call one of them and shape the response."""
