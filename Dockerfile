# The crmflow image used by docker-compose.yml: one image, three roles (migrate, worker, api).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY engine engine
COPY api api
COPY sql sql
COPY migrations migrations
COPY examples examples
RUN pip install --no-cache-dir .
ENTRYPOINT ["crmflow"]
