# The NIXL launcher script guide's 4-node example (2 prefill nodes + 2 decode nodes, 8
# servers per node, DP 16 per role), as `disagg launch --role ...`: the script's own flags,
# verbatim. Run the line for your node; then the router on any node:
#   disagg --vllm-pd-disaggregation --port 9192 --prefill-policy cache_aware --decode-policy cache_aware \
#     --prefill http://192.168.1.100:8300 ... --decode http://192.168.1.102:9300 ...
# tests/it/guides.rs runs each line with --dry-run.

# Prefill Node 0 (DP ranks 0-7)
disagg launch --role prefill --num-instances 8 --dp-size 16 --node-size 2 --node-rank 0 --node-ip 192.168.1.100 --dp-master-ip 192.168.1.100
# Prefill Node 1 (DP ranks 8-15)
disagg launch --role prefill --num-instances 8 --dp-size 16 --node-size 2 --node-rank 1 --node-ip 192.168.1.101 --dp-master-ip 192.168.1.100
# Decode Node 0 (DP ranks 0-7)
disagg launch --role decode --num-instances 8 --dp-size 16 --node-size 2 --node-rank 0 --node-ip 192.168.1.102 --dp-master-ip 192.168.1.102
# Decode Node 1 (DP ranks 8-15)
disagg launch --role decode --num-instances 8 --dp-size 16 --node-size 2 --node-rank 1 --node-ip 192.168.1.103 --dp-master-ip 192.168.1.102
