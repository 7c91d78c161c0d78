from streamconv.cli import run

run()
