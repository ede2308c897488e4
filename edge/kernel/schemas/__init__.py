"""JSON Schemas of the messages the daemon publishes (package data)."""
