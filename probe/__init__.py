"""The probe: a process that holds the model a database was recorded from and answers live requests.

`gluscope probe FILE.duckdb` starts it (cli.py); the web server forwards its
probe pages to it (server/probe_client.py), so the server never imports torch.
loaded.py finds and checks the model, forward.py runs passes with reads and
edits, answers.py turns requests into passes and passes into bodies,
batcher.py queues and batches them, app.py is the HTTP face.
"""
