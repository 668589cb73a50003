"""The HTTP front door: Ollama's and OpenAI's APIs over the fleet, the seed's task API, and
Prometheus metrics. Every chat goes through the bus (a `chat.requested` event, the answer from
the token events); nothing talks to a runtime directly."""
