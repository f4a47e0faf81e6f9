# The `cdc` command in a container: used by docker-compose.yml for `cdc capture` and `cdc sink`.
FROM python:3.11-slim

WORKDIR /app
# Only what the package needs: a local .venv or lake must not end up in the image.
COPY pyproject.toml README.md ./
COPY cdc ./cdc
COPY sinks ./sinks
COPY catalog ./catalog
COPY transforms ./transforms
COPY jobs ./jobs
RUN pip install --no-cache-dir .

# Run as an unprivileged user; the lake volume is created writable for it.
RUN useradd --create-home cdc && mkdir /lake && chown cdc /lake
USER cdc
CMD ["cdc", "--help"]
