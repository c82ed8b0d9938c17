from gateway import create_app

app = create_app()

if __name__ == "__main__":
    # Flask's development server, for local hacking only; production runs gunicorn.
    app.run(host="127.0.0.1", port=app.extensions["gateway.settings"].port, threaded=True)
