#!/usr/bin/env bash
# Certificates for the TLS tests, made with openssl (Debian's): in DIR,
#   ca.pem / ca.key              a test CA
#   server.pem / server.key      signed by it, for 127.0.0.1, ::1 and localhost
#   server2.pem / server2.key    another one for the same names (a renewed certificate)
#   client.pem / client.key      a client certificate signed by the CA (mTLS)
#   expired.pem / expired.key    a server certificate of the CA, expired in 2020
#   other-ca.pem                 another CA, and other-client.pem / .key signed by it
# Usage: scripts/test-certs.sh DIR   (idempotent: an existing complete DIR is kept)
set -euo pipefail
dir=${1:?usage: scripts/test-certs.sh DIR}
mkdir -p "$dir"
cd "$dir"
[[ -f done ]] && exit 0
quiet() { "$@" >/dev/null 2>&1 || { echo "test-certs: $* failed" >&2; "$@"; exit 1; }; }
san="subjectAltName=IP:127.0.0.1,IP:::1,DNS:localhost"
quiet openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 3650 -subj "/CN=disagg test CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
quiet openssl req -x509 -newkey rsa:2048 -nodes -keyout other-ca.key -out other-ca.pem -days 3650 -subj "/CN=another CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
leaf() { # name ca subject extensions
  quiet openssl req -newkey rsa:2048 -nodes -keyout "$1.key" -out "$1.csr" -subj "/CN=$3"
  printf '%s\n' "$4" > "$1.ext"
  quiet openssl x509 -req -in "$1.csr" -CA "$2.pem" -CAkey "$2.key" -CAcreateserial -out "$1.pem" -days 825 -extfile "$1.ext"
}
leaf server ca localhost "$san"$'\n'"extendedKeyUsage=serverAuth"
leaf server2 ca localhost "$san"$'\n'"extendedKeyUsage=serverAuth"
leaf client ca router "extendedKeyUsage=clientAuth"
leaf other-client other-ca stranger "extendedKeyUsage=clientAuth"
# An expired server certificate: `openssl ca` takes explicit dates.
mkdir -p ca-db && : > ca-db/index.txt && echo 1000 > ca-db/serial
cat > ca-db/ca.cnf <<EOF
[ca]
default_ca = test
[test]
dir = ca-db
database = ca-db/index.txt
serial = ca-db/serial
new_certs_dir = ca-db
default_md = sha256
policy = any
copy_extensions = copy
[any]
commonName = supplied
EOF
quiet openssl req -newkey rsa:2048 -nodes -keyout expired.key -out expired.csr -subj "/CN=localhost" -addext "$san"
quiet openssl ca -batch -config ca-db/ca.cnf -cert ca.pem -keyfile ca.key -in expired.csr -out expired.pem \
  -startdate 20200101000000Z -enddate 20200102000000Z -notext
touch done
