from latentlab.cli import app

app()
