"""Where to look: stratified (ARCO SG/SAG) and information-guided (IGU-Aug) pixel sampling."""
