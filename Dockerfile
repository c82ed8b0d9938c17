# The gateway under gunicorn, as in the README: `gunicorn -c gunicorn.conf.py app:app`.
# One stage: every pinned dependency ships a binary wheel for CPython 3.12 on Linux, so
# there is no compiler to leave behind in a build stage.
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# A fixed numeric UID, so Kubernetes' runAsNonRoot can verify it (k8s-deployment.yaml
# sets the same runAsUser). No home directory and no shell: the gateway needs neither.
RUN groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid gateway --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin gateway

WORKDIR /app

# Dependencies in their own layer: it is rebuilt only when requirements.txt changes.
COPY requirements.txt .
RUN pip install --no-cache-dir --disable-pip-version-check --root-user-action=ignore \
        -r requirements.txt

# The code stays owned by root: the process that runs it cannot rewrite it.
COPY app.py gunicorn.conf.py ./
COPY gateway/ gateway/

USER 10001:10001
EXPOSE 8080

# No curl in a slim image: the interpreter that is already there makes the request.
# urlopen raises (exit status 1) on a refused connection, a timeout or a non-2xx answer.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('PORT', '8080') + '/health', timeout=4)"]

# Exec form: gunicorn is PID 1 and receives SIGTERM itself, so in-flight streams drain.
CMD ["gunicorn", "-c", "gunicorn.conf.py", "app:app"]
