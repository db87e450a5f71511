from latentlab.launch import main

main()
