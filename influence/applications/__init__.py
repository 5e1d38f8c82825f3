"""The paper's uses of influence, built on the library: training-set attacks (Sec. 5.2),
fixing mislabeled data (Sec. 5.4) and the components of influence (Fig 1).

``influence.applications.attack`` (``TrainingSetAttack``), ``.mislabel`` (check-and-fix
loops), ``.components`` (``influence_components``).
"""
