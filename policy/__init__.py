"""Pure certificate policy: profiles, CSR and key checks, TBS building under constraints, lints (no I/O).

Modules: errors (PolicyError), profiles (Profile, load_profiles), csr (check_csr, check_public_key),
certs (build_tbs, IssuerInfo, IssueSpec, signature_hash), lint (pkilint in-process).
"""
