// The browser bundle of @getalby/bitcoin-connect for the paywall tests, built with esbuild
// into one file that defines window.bitcoinConnect (tests/games/test_paywall_wallets.py;
// docs/games.md shows operators the same command).
export * from "@getalby/bitcoin-connect";
