# Build stage: compile the release binary (the rust image has OpenSSL's
# headers and pkg-config, which native-tls builds against).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY src ./src
COPY migrations ./migrations
# The manifest names the benches' files: cargo refuses a manifest whose
# targets are missing, even to build only the binary.
COPY benches ./benches
RUN cargo build --release --locked --bin reliability-lab

# Run stage: the binary, OpenSSL's library (Postgres TLS goes through it, as
# libpq's does) and the system's roots (sslrootcert=system).
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends libssl3 ca-certificates \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --system --uid 10001 lab
COPY --from=build /src/target/release/reliability-lab /usr/local/bin/reliability-lab
USER lab
ENV LISTEN_ADDR=0.0.0.0:8080
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/reliability-lab"]
