#!/usr/bin/env bash
# Makes a private CA and one NATS route certificate per host, for nats-config/vps/nats.conf.
#
#   compose/route-certs.sh OUTDIR HOST [HOST...]
#
# HOST is the name (or IP address) the other hosts put in their route URLs, e.g.
# node1.example.net or 203.0.113.10; each gets OUTDIR/HOST/{route.pem,route-key.pem,ca.pem}.
# Copy OUTDIR/HOST/* to /etc/jetmq/nats-tls/ on that host, keeping the modes (scp -p). The CA key stays in OUTDIR/ca:
# keep it offline; it is needed only to add a host later (run again with the new host: an
# existing CA is reused). Certificates are valid for 825 days.
set -euo pipefail

if [ "$#" -lt 2 ]; then
  echo "usage: $0 OUTDIR HOST [HOST...]" >&2
  exit 2
fi
out="$1"; shift
mkdir -p "$out/ca"
umask 077

if [ ! -f "$out/ca/ca-key.pem" ]; then
  openssl req -x509 -newkey rsa:3072 -sha256 -nodes -days 3650 \
    -subj "/CN=jetmq NATS route CA" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -keyout "$out/ca/ca-key.pem" -out "$out/ca/ca.pem" 2>/dev/null
fi

for host in "$@"; do
  dir="$out/$host"
  mkdir -p "$dir"
  if [[ "$host" =~ ^[0-9.]+$ || "$host" == *:* ]]; then san="IP:$host"; else san="DNS:$host"; fi
  openssl req -newkey rsa:3072 -sha256 -nodes -subj "/CN=$host" \
    -keyout "$dir/route-key.pem" -out "$dir/route.csr" 2>/dev/null
  # A route is a TLS server for the hosts that dial it and a TLS client when it dials them.
  openssl x509 -req -sha256 -days 825 -in "$dir/route.csr" \
    -CA "$out/ca/ca.pem" -CAkey "$out/ca/ca-key.pem" -CAcreateserial \
    -extfile <(printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth,clientAuth\nkeyUsage=critical,digitalSignature,keyEncipherment\n' "$san") \
    -out "$dir/route.pem" 2>/dev/null
  rm -f "$dir/route.csr"
  cp "$out/ca/ca.pem" "$dir/ca.pem"
  # The private key is for the NATS server only: 0600, like the directory (0700). The nats
  # image runs nats-server as root, which reads it; certificates are public (0644).
  chmod 0600 "$dir/route-key.pem"
  chmod 0644 "$dir/route.pem" "$dir/ca.pem"
  chmod 0700 "$dir"
  echo "$dir: route.pem (SAN $san), route-key.pem, ca.pem"
done
