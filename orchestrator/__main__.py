from orchestrator.console.cli import main

main()
