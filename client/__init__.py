"""Site agent: data manifest, feature extraction, local steps and ClientApp."""
