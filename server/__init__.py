"""The server process's composition root: settings, and the services it wires into the API."""
