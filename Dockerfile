# Placeholder until the service issue: a CPU image that runs `pam serve` on a bundle.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY merging ./merging
COPY mobile_export ./mobile_export
COPY service ./service
RUN pip install --no-cache-dir .
CMD ["pam", "--help"]
